// Error checks and the device guard of the launchers.
#include "device_util.cuh"
#include "launchers.h"

namespace pygpo {

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("pygpo._C: ") + what + ": " + cudaGetErrorName(err) + ": " +
                                 cudaGetErrorString(err));
    }
}

namespace {

// Devices the runtime sees, and the runtime's error when it sees none (cudaSuccess otherwise).
int query_devices(cudaError_t* why) {
    int n = 0;
    *why = cudaGetDeviceCount(&n);
    if (*why != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver / no device" error
        return 0;
    }
    return n;
}

void check_device_index(int device) {
    cudaError_t why;
    int n = query_devices(&why);
    if (n == 0) {
        std::string reason = why == cudaSuccess ? "the runtime lists 0 devices"
                                                : std::string(cudaGetErrorName(why)) + ": " + cudaGetErrorString(why);
        throw std::runtime_error(
            "no CUDA device: pygpo._C launches CUDA kernels, but the CUDA runtime sees no device (" + reason +
            "; no GPU, no driver or one older than the toolkit that built pygpo._C, or CUDA_VISIBLE_DEVICES hides "
            "them); use backend='torch' or 'triton' on this machine");
    }
    if (device < 0 || device >= n) {
        throw std::runtime_error("pygpo._C: device index " + std::to_string(device) + " out of range [0, " +
                                 std::to_string(n) + ")");
    }
}

}  // namespace

int device_count() {
    cudaError_t why;
    return query_devices(&why);
}

DeviceGuard::DeviceGuard(int device) {
    check_device_index(device);
    int current = 0;
    check_cuda(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device) {
        check_cuda(cudaSetDevice(device), "cudaSetDevice");
        previous_ = current;
    }
}

DeviceGuard::~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);  // a destructor must not throw; the launch already ran
}

}  // namespace pygpo
