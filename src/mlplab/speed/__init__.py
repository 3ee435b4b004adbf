"""Speed beside the idiom: the opt-in fast path (`data.chunk`: several batches per Lightning
step, the same optimiser steps) and CUDA graph replay; each refuses in one line what it cannot
keep exact."""
