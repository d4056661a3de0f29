"""Planning: compiled programs' cost, memory and time before running them."""
