// pybind11 bindings of pygpo._C. No torch headers: Python passes addresses (tensor.data_ptr()), sizes,
// strides, dtype codes and the CUDA stream handle torch uses, so one build works with any torch.
// The argument structs are exposed as classes with one attribute per field (see launchers.h).
#include <pybind11/pybind11.h>

#include "softmax_stats.cuh"
#include "launchers.h"

namespace py = pybind11;
using namespace pygpo;

#ifndef PYGPO_CUDA_ARCHS
#define PYGPO_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(_C, m) {
    m.doc() = "pygpo's compiled CUDA kernels (logits-tile epilogue, pairwise loss head) and their host twins";
    m.attr("FLOAT32") = int(kFloat32);
    m.attr("FLOAT16") = int(kFloat16);
    m.attr("BFLOAT16") = int(kBFloat16);
    m.attr("FLOAT64") = int(kFloat64);
    m.attr("STATE_FIELDS") = kStateFields;
    m.attr("CUDA_ARCHS") = PYGPO_CUDA_ARCHS;

    py::class_<EpilogueArgs>(m, "EpilogueArgs")
        .def(py::init<>())
        .def_readwrite("tile", &EpilogueArgs::tile)
        .def_readwrite("dtype", &EpilogueArgs::dtype)
        .def_readwrite("rows", &EpilogueArgs::rows)
        .def_readwrite("cols", &EpilogueArgs::cols)
        .def_readwrite("ld", &EpilogueArgs::ld)
        .def_readwrite("bias", &EpilogueArgs::bias)
        .def_readwrite("labels", &EpilogueArgs::labels)
        .def_readwrite("v0", &EpilogueArgs::v0)
        .def_readwrite("vocab", &EpilogueArgs::vocab)
        .def_readwrite("inv_temperature", &EpilogueArgs::inv_temperature)
        .def_readwrite("softcap", &EpilogueArgs::softcap);
    py::class_<FoldArgs>(m, "FoldArgs")
        .def(py::init<>())
        .def_readwrite("state", &FoldArgs::state)
        .def_readwrite("first", &FoldArgs::first)
        .def_readwrite("last", &FoldArgs::last)
        .def_readwrite("logprobs", &FoldArgs::logprobs)
        .def_readwrite("lse", &FoldArgs::lse)
        .def_readwrite("entropy", &FoldArgs::entropy)
        .def_readwrite("log_sum_p2", &FoldArgs::log_sum_p2)
        .def_readwrite("mean_logit", &FoldArgs::mean_logit)
        .def_readwrite("is_top1", &FoldArgs::is_top1);
    py::class_<GradArgs>(m, "GradArgs")
        .def(py::init<>())
        .def_readwrite("lse", &GradArgs::lse)
        .def_readwrite("g_logprobs", &GradArgs::g_logprobs)
        .def_readwrite("g_lse", &GradArgs::g_lse)
        .def_readwrite("g_entropy", &GradArgs::g_entropy)
        .def_readwrite("entropy", &GradArgs::entropy)
        .def_readwrite("g_log_sum_p2", &GradArgs::g_log_sum_p2)
        .def_readwrite("log_sum_p2", &GradArgs::log_sum_p2)
        .def_readwrite("g_mean_logit", &GradArgs::g_mean_logit);
    py::class_<HeadArgs>(m, "HeadArgs")
        .def(py::init<>())
        .def_readwrite("dtype", &HeadArgs::dtype)
        .def_readwrite("logps", &HeadArgs::logps)
        .def_readwrite("ref", &HeadArgs::ref)
        .def_readwrite("weights", &HeadArgs::weights)
        .def_readwrite("index", &HeadArgs::index)
        .def_readwrite("tokens", &HeadArgs::tokens)
        .def_readwrite("pairs", &HeadArgs::pairs)
        .def_readwrite("ref_scores", &HeadArgs::ref_scores)
        .def_readwrite("head", &HeadArgs::head)
        .def_readwrite("beta", &HeadArgs::beta)
        .def_readwrite("b", &HeadArgs::b)
        .def_readwrite("margin", &HeadArgs::margin)
        .def_readwrite("eps", &HeadArgs::eps)
        .def_readwrite("normalize", &HeadArgs::normalize);
    py::class_<HeadOutputs>(m, "HeadOutputs")
        .def(py::init<>())
        .def_readwrite("scores", &HeadOutputs::scores)
        .def_readwrite("counts", &HeadOutputs::counts)
        .def_readwrite("per_example", &HeadOutputs::per_example)
        .def_readwrite("loss", &HeadOutputs::loss);
    py::class_<HeadGrads>(m, "HeadGrads")
        .def(py::init<>())
        .def_readwrite("g_loss", &HeadGrads::g_loss)
        .def_readwrite("g_per_example", &HeadGrads::g_per_example)
        .def_readwrite("d_logps", &HeadGrads::d_logps)
        .def_readwrite("d_ref", &HeadGrads::d_ref)
        .def_readwrite("d_ref_scores", &HeadGrads::d_ref_scores);

    auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("device_count", &device_count, "CUDA devices the extension's runtime sees (0 without driver or GPU)");
    m.def("epilogue_fwd", &device_epilogue_fwd, py::arg("device"), py::arg("stream"), py::arg("args"), py::arg("fold"),
          nogil, "Fold a tile of raw logits into the rows' running statistics (CUDA)");
    m.def("epilogue_bwd", &device_epilogue_bwd, py::arg("device"), py::arg("stream"), py::arg("args"), py::arg("grad"),
          nogil, "Overwrite a recomputed tile with d loss / d raw (CUDA)");
    m.def("head_fwd", &device_head_fwd, py::arg("device"), py::arg("stream"), py::arg("args"), py::arg("outputs"),
          nogil, "Segment reduce + pairwise loss, forward (CUDA, one launch)");
    m.def("head_bwd", &device_head_bwd, py::arg("device"), py::arg("stream"), py::arg("args"), py::arg("saved"),
          py::arg("grads"), nogil, "Segment reduce + pairwise loss, backward (CUDA, one launch)");
    m.def("host_epilogue_fwd", &host_epilogue_fwd, py::arg("args"), py::arg("fold"), py::arg("lanes"), nogil,
          "Host twin of epilogue_fwd on CPU pointers");
    m.def("host_epilogue_bwd", &host_epilogue_bwd, py::arg("args"), py::arg("grad"), py::arg("lanes"), nogil,
          "Host twin of epilogue_bwd on CPU pointers");
    m.def("host_head_fwd", &host_head_fwd, py::arg("args"), py::arg("outputs"), py::arg("lanes"), nogil,
          "Host twin of head_fwd on CPU pointers");
    m.def("host_head_bwd", &host_head_bwd, py::arg("args"), py::arg("saved"), py::arg("grads"), nogil,
          "Host twin of head_bwd on CPU pointers");
}
