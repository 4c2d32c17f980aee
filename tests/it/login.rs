//! Issue 3: HandleCallback against the fake Bitbucket (being written).
