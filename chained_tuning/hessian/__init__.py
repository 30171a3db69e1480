"""The Hessian of a language model's answer-token loss: its spectral radius and extreme eigenvalues from
Hessian-vector products (the curvature of paper section 4.3; curvature.py is its command line).

Copy set: copy the folder hessian/ (under any name: its imports are relative); needs torch (and numpy); csrc/ +
setup.py for the fused ops (the module curvature_ext, or a JIT build of csrc/ two folders above this one), else
plain PyTorch. Nothing of the rest of the project: the model and its batches are handed in ({"input_ids",
"attention_mask", "labels"}, labels -100 outside the answer; chained_tuning.loss builds them for curvature.py).

    from hessian.spectrum import hessian_spectrum
    result = hessian_spectrum(model, batches)         # result["rho"], ["lambda_max"], ["lambda_min"], ...
    from hessian.measures import spectral_measures    # trace, density, top-k, per-block extremes on its operator

Modules, one concern each:
    spectrum.py     hessian_spectrum: options, backend, operator, start vector, solve, the result record
    operator.py     HessianOperator: H v by double backward through retained (or rebuilt) first-order graphs
    answer_loss.py  the answer-token loss and the forwards it runs (answer rows only, verified shortcuts)
    solvers.py      Lanczos (also with full reorthogonalisation) and power iteration, the certified bounds and
                    stop rules, the start vectors
    measures.py     beyond rho: Hutch++ trace, SLQ density, top-k at both ends, per-block extremes
    measure_names.py  their names and the check of a list of them (torch-free: the study checks CURV_MEASURES)
    sharded.py      several processes (torchrun): samples split across ranks, solver vectors sharded
    ops.py          the C++/CUDA op library: loading, typed wrappers, fake kernels and autograd formulas
    reference.py    the plain-PyTorch references of the ops (the fallback)
    layerwise.py    H v one decoder layer at a time (gradient checkpointing of the HVP)
    answer_rows.py  the last decoder layer run at the answer rows only
    attention.py    attention in causal blocks with the softmax's double backward fused (CPU)
    errors.py       HessianError, CurvatureError, ExtensionError
The manual: docs/curvature.md.
"""
