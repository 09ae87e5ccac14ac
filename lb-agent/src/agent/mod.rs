//! Agent loops.
