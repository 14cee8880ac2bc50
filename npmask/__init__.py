"""npmask: binary-mask multi-domain learning in NumPy/CuPy with hand-written backprop."""
__version__ = "0.1.0"
