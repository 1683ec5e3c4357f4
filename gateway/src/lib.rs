//! Switchyard gateway (filled by the gateway issue).
