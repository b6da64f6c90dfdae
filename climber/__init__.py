"""climber: the MTop client offering local SOCKS5 and HTTP proxies."""
