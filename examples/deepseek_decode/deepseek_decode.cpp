// deepseek_decode: a scaled-down DeepSeek-V2-Lite-style model (MLA attention
// with decoupled RoPE, a dense first layer, then MoE layers with shared and
// group-limited routed experts) decoding a few requests with random weights,
// on the CPU.
//
//   deepseek_model.hpp  flags, model and weights, the step loop (KVCacheManager
//                       hands out the latent cache's slots), the summary;
//                       shared with the CUDA build (deepseek_decode_cuda.cu)
//   cpu_forward.hpp     the forward pass: mla_compress into the bf16 latent
//                       cache, naive prefill (decompress K/V, standard paged
//                       attention), absorbed decode (mla_decode_attention over
//                       the latent rows), MoE routing, dispatch and combine
//
// `--check` also runs the naive path at every decode step and reports the
// largest difference between the two attention outputs (tolerance 1e-4).

#include <cstdio>

#include "cpu_forward.hpp"
#include "deepseek_model.hpp"

int main(int argc, char** argv) try {
  const deepseek::Options opt = deepseek::parse_options(argc, argv);
  const deepseek::Model model = deepseek::make_model(opt.seed);
  deepseek::CpuForward cpu(model, opt, opt.check);
  deepseek::serve(opt, model, cpu, "deepseek_decode");
  if (opt.check) {
    const bool ok = cpu.max_check_diff() <= 1e-4;
    std::printf("check: max |absorbed - naive| attention output = %.3g (%s, tolerance 1e-4)\n", cpu.max_check_diff(),
                ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
  }
  return 0;
} catch (const kvkit::Error& e) {
  std::fprintf(stderr, "deepseek_decode: %s\n", e.what());
  return 1;
}
