"""Authentication providers for SMTP AUTH: twisted.cred checkers behind the one portal of
:mod:`dcrouter.smtp.auth` (docs/auth.md). The users table is in :mod:`dcrouter.smtp.auth`; here are the
directory (:mod:`.ldap`), OAuth 2.0 bearer tokens (:mod:`.oauth2`), the chain that asks them in order
(:mod:`.chain`) and the assembly from configuration, third-party providers included (:mod:`.build`)."""
