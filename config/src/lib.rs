//! Switchyard deployment and routing-policy files (filled by the gateway issue).
