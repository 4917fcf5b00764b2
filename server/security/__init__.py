"""Who may call what: TLS, credentials, roles, audit and per-caller limits."""
