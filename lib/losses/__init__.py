"""One small module per loss family; pure functions of tensors."""
