//! Support for black-box tests.
