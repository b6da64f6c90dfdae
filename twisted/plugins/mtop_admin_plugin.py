from twisted.application.service import ServiceMaker

mtop_admin = ServiceMaker(
    "MTop admin API",
    "mtop.admintap",
    "MTop admin API: users over HTTP and JSON, on the database of mtop.yaml",
    "mtop-admin",
)
