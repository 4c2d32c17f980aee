//! Connector data sealing (being written).
