"""The code generator: tile programs (``tilemix.tiles``' typed IR) to CUDA kernels, and their running.

Lowering turns a traced program into CUDA C++ as a sequence of passes over its IR: structure and
accumulation analysis, shared-memory layout, the order a chunk loop issues its matmuls in
(``issue_order``), and emission into calls of the tile headers (``tiles/include/tilemix``), for two
targets: warp-specialised sm_90a kernels with TMA and wgmma (``hopper``) and generic mma.sync
kernels for sm_80/86/89 or a Hopper told to run them (``generic``). ``schedule`` states how a
program is laid onto the GPU (ring depth, consumer warpgroups, column split, issue order, chunk
overlap) apart from its math, with the constants every layer shares. ``compile`` builds a cubin
through NVRTC for an exact arch, with a disk cache, and reads its SASS and resources without a GPU;
``launch`` specialises, lowers, compiles and launches a kernel on torch tensors; ``tune`` searches a
program's schedules and block sizes on the GPU at hand, checks each candidate against the
interpreter, and caches the fastest.
"""
