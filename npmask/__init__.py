"""npmask: binary-mask multi-domain learning in NumPy/CuPy with hand-written backprop."""
import os as _os

# OpenBLAS (NumPy's BLAS) keeps its worker threads busy-waiting for ~0.1 s after every matrix
# product (2^28 cycles), in case another follows at once. Between two GEMMs a training step copies
# (im2col) on several threads (npmask/nn/conv.py), and the spinning workers take those threads'
# cores: measured on 2 cores, a full WRN-28-4 step is ~10% faster when they sleep after 2^4 cycles
# (benchmarks/results/conv_cpu.txt). OpenBLAS reads the variable once, when NumPy is first imported,
# so it only takes effect if npmask is imported before NumPy (as in ``python -m npmask.train``);
# a value you set yourself is kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
