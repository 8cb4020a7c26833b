"""Plans and surgery: masks, coupled-channel removal, low-rank replacement."""
