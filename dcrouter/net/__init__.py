"""What SMTP and the proxy share: domain matching, CIDR sets, TLS contexts."""
