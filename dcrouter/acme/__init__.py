"""ACME (RFC 8555): certificates for terminated proxy routes, obtained and renewed from a directory.

`challenges` serves HTTP-01 key authorizations on port 80, `client` speaks ACME with certbot's `acme`
package in a thread pool, `service` decides what to obtain and when to renew.
"""
