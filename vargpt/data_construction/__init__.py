"""data_construction package."""
