"""The TCP/TLS/HTTP proxy: peeking at a connection's first bytes, routing by SNI or Host, forwarding."""
