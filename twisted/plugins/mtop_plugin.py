from twisted.application.service import ServiceMaker

mtop = ServiceMaker(
    "MTop server",
    "mtop.tap",
    "MTop protocol v1 server: authenticated TCP tunnels over TLS 1.3",
    "mtop",
)
