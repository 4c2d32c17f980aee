//! JSON Schema subset validator and spec extraction (tests only).
