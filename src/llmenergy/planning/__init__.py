"""Config → cells: the matrix, feasibility, estimates and `llmenergy plan` (no torch)."""
