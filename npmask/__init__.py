"""npmask: binary-mask multi-domain learning in NumPy/CuPy with hand-written backprop.

On a CPU, npmask runs its own threads (npmask/nn/parallel.py; ``NPMASK_THREADS`` sets how many, 1
turns them off): convolutions are split into chunks of images, each chunk's GEMM on one BLAS thread,
with BLAS held at one thread meanwhile (threadpoolctl) so that OpenBLAS's workers, which busy-wait
after every multi-threaded GEMM, never take the cores the threads use.
"""
__version__ = "0.1.0"
