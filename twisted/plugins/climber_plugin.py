from twisted.application.service import ServiceMaker

climber = ServiceMaker(
    "climber",
    "climber.tap",
    "MTop client: local SOCKS5 and HTTP proxies and port forwards through MTop tunnels",
    "climber",
)
