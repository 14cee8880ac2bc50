"""npmask: binary-mask multi-domain learning in NumPy/CuPy with hand-written backprop.

Speed note for large models on a CPU: OpenBLAS (NumPy's BLAS) keeps its worker threads busy-waiting
for ~0.1 s after every matrix product, on the cores npmask's own threads would use
(npmask/nn/parallel.py). Starting Python with ``OPENBLAS_THREAD_TIMEOUT=4`` makes them sleep at
once: a WRN-28-4 step at 64x64 was then 9% faster on 2 cores (1.864 s to 1.697 s, back-to-back
runs), but the small default synthetic job seemed slower with it (421 s of training with it and an
earlier, lower thread threshold, against 344 s without; separate runs on a noisy machine; many small
GEMMs each wait for the workers to wake), so npmask leaves the setting to you
(benchmarks/results/train_step_cpu.txt has the measurements).
"""
__version__ = "0.1.0"
