//! The browser app. Nothing here yet: the browser chat issue fills it.
