"""Networks by name: the timm backbone factory and the sequence heads (output size given by the task)."""
