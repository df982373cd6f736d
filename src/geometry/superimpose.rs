//! Kabsch superposition (in progress).
