// masked_attention backward, tensor-core kernels for head dim 64 (bfloat16, float16).
// One file per head dim so the instantiations compile in parallel.
#include "attention/attention_cuda.cuh"

namespace vae_ext::attn {
template void run_bwd_tc<__nv_bfloat16, 64>(const AttentionBackwardParams&, const BwdWorkspace&, cudaStream_t);
template void run_bwd_tc<__half, 64>(const AttentionBackwardParams&, const BwdWorkspace&, cudaStream_t);
}  // namespace vae_ext::attn
