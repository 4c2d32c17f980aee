//! The fake Bitbucket Cloud (being written).
