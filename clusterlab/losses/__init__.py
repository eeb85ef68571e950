"""Loss functions, one module per paper plus the shared pieces; pure functions of tensors."""
