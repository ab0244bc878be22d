"""SMTP ingress: the ESMTP server protocol, its session policy, AUTH and the DATA spool."""
