"""The Hessian of a loss: operator, solvers, the C++/CUDA ops."""
