"""Inbound message authentication (``smtpConfig.verification``): SPF, DKIM, DMARC and ARC, reported in one
``Authentication-Results`` field (RFC 8601) and acted on by the processing chain as a scanner's finding."""
