"""custom_bn's integrations with other libraries and torch subsystems, each in its own file."""
