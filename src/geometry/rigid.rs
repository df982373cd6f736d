//! Rigid transforms on tensors (in progress).
