"""Reading and writing checkpoint files; nothing here knows about key schemes."""
