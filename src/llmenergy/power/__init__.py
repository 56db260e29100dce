"""One node: power backends, the collector process, power caps and the node agent."""
