"""Users: stage and contraindications, and usage over rolling windows."""
