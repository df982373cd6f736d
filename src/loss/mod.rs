//! AF2 losses (supplement section 1.9) as free functions, and structure metrics.
