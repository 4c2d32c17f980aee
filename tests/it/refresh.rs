//! Issue 4: Refresh and sealed connector data (being written).
