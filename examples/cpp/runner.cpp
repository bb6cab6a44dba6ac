// Runs a GENIE sampler exported by genie_kernels.export (an AOTInductor .pt2 package)
// without Python: noise in, sample out, and the time of N calls.
//
//   genie_runner PACKAGE [--noise FILE] [--seed S] [--out FILE] [--pgm FILE] [--iters N]
//
// PACKAGE pins the noise shape, dtype and device (its metadata, written by export(), says
// which: genie_kernels.shape, .dtype, .device).  --noise reads the noise as raw float32 in
// C order (what numpy's tofile writes), so the output can be compared with Python's on the
// same noise; without it the noise is torch::randn with --seed.  --out writes the sample as
// raw float32, --pgm as a grey image (one channel, values in [-1, 1], the batch side by
// side).  --iters N times N calls after one warm-up and prints the median milliseconds.
// On CUDA (a CUDA build of libtorch, GENIE_WITH_CUDA) the timed calls replay a CUDA graph
// captured from one call on a fixed input buffer.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#ifdef GENIE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string package, noise_path, out_path, pgm_path;
  uint64_t seed = 0;
  int iters = 0;
};

Options parse_args(int argc, char** argv) {
  if (argc < 2) throw std::runtime_error("usage: genie_runner PACKAGE [--noise FILE] [--seed S] [--out FILE] [--pgm FILE] [--iters N]");
  Options options;
  options.package = argv[1];
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
    const std::string value = argv[i + 1];
    if (flag == "--noise") options.noise_path = value;
    else if (flag == "--out") options.out_path = value;
    else if (flag == "--pgm") options.pgm_path = value;
    else if (flag == "--seed") options.seed = std::stoull(value);
    else if (flag == "--iters") options.iters = std::stoi(value);
    else throw std::runtime_error("unknown option " + flag);
  }
  return options;
}

std::string metadata_value(const std::unordered_map<std::string, std::string>& metadata, const std::string& key) {
  auto found = metadata.find("genie_kernels." + key);
  if (found == metadata.end())
    throw std::runtime_error("the package has no genie_kernels." + key + ": was it written by genie_kernels.export?");
  return found->second;
}

// "[1, 1, 28, 28]" -> {1, 1, 28, 28}
std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::string number;
  for (char c : text) {
    if (c >= '0' && c <= '9') {
      number += c;
    } else if (!number.empty()) {
      shape.push_back(std::stoll(number));
      number.clear();
    }
  }
  if (shape.empty()) throw std::runtime_error("cannot read the shape " + text);
  return shape;
}

torch::Tensor read_float32(const std::string& path, const std::vector<int64_t>& shape) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw std::runtime_error("cannot open " + path);
  auto tensor = torch::empty(shape, torch::kFloat32);
  const auto expected = static_cast<std::streamsize>(tensor.numel() * sizeof(float));
  if (file.tellg() != expected)
    throw std::runtime_error(path + " holds " + std::to_string(file.tellg()) + " bytes; the package's noise needs " +
                             std::to_string(expected) + " (float32, C order)");
  file.seekg(0);
  file.read(reinterpret_cast<char*>(tensor.data_ptr<float>()), expected);
  return tensor;
}

void write_float32(const std::string& path, const torch::Tensor& sample) {
  auto values = sample.to(torch::kCPU, torch::kFloat32).contiguous();
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(values.data_ptr<float>()), values.numel() * sizeof(float));
  if (!file) throw std::runtime_error("cannot write " + path);
}

// The batch of one-channel images side by side, [-1, 1] mapped to [0, 255].
void write_pgm(const std::string& path, const torch::Tensor& sample) {
  if (sample.dim() != 4 || sample.size(1) != 1) {
    std::cerr << "genie_runner: no PGM: the sample is not (B, 1, H, W)\n";
    return;
  }
  const int64_t batch = sample.size(0), height = sample.size(2), width = sample.size(3);
  auto pixels = ((sample.to(torch::kCPU, torch::kFloat32).squeeze(1).clamp(-1, 1) + 1) * 127.5).round().to(torch::kUInt8);
  pixels = pixels.permute({1, 0, 2}).reshape({height, batch * width}).contiguous();
  std::ofstream file(path, std::ios::binary);
  file << "P5\n" << batch * width << " " << height << "\n255\n";
  file.write(reinterpret_cast<const char*>(pixels.data_ptr<uint8_t>()), pixels.numel());
  if (!file) throw std::runtime_error("cannot write " + path);
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

template <typename Call>
std::vector<double> time_calls(int iters, bool cuda, Call call) {
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto start = std::chrono::steady_clock::now();
    call();
#ifdef GENIE_WITH_CUDA
    if (cuda) c10::cuda::getCurrentCUDAStream().synchronize();
#else
    (void)cuda;
#endif
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  return ms;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = parse_args(argc, argv);
    const auto metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(options.package, "model");
    const auto shape = parse_shape(metadata_value(metadata, "shape"));
    const std::string dtype_name = metadata_value(metadata, "dtype");
    const std::string device_name = metadata_value(metadata, "device");
    const auto dtype = dtype_name == "float64" ? torch::kFloat64 : torch::kFloat32;
    const bool cuda = device_name == "cuda";
    if (cuda && !torch::cuda::is_available())
      throw std::runtime_error(options.package + " was built for CUDA, which is not available here");
#ifndef GENIE_WITH_CUDA
    if (cuda) throw std::runtime_error("this runner was built against a libtorch without CUDA; the package needs CUDA");
#endif
    torch::inductor::AOTIModelPackageLoader loader(options.package);
    const torch::Device device(cuda ? torch::kCUDA : torch::kCPU);

    torch::Tensor noise = options.noise_path.empty()
                              ? (torch::manual_seed(options.seed), torch::randn(shape, torch::kFloat32))
                              : read_float32(options.noise_path, shape);
    noise = noise.to(device, dtype).contiguous();

    torch::NoGradGuard no_grad;
    torch::Tensor sample = loader.run({noise})[0];
    if (!options.out_path.empty()) write_float32(options.out_path, sample);
    if (!options.pgm_path.empty()) write_pgm(options.pgm_path, sample);

    if (options.iters > 0) {
      std::vector<double> ms;
      std::string how = "loader.run";
#ifdef GENIE_WITH_CUDA
      if (cuda) {
        // Capture one call on a fixed input buffer in a CUDA graph (on a side stream, after a
        // warm-up there), then time its replays.  Untested without a GPU.
        auto stream = c10::cuda::getStreamFromPool();
        c10::cuda::CUDAStreamGuard guard(stream);
        torch::Tensor static_noise = noise.clone();
        loader.run({static_noise}, stream.stream());
        stream.synchronize();
        at::cuda::CUDAGraph graph;
        graph.capture_begin();
        torch::Tensor static_sample = loader.run({static_noise}, stream.stream())[0];
        graph.capture_end();
        graph.replay();
        stream.synchronize();
        if (!torch::allclose(static_sample, sample))
          std::cerr << "genie_runner: warning: the graph replay differs from the plain call\n";
        ms = time_calls(options.iters, true, [&] { graph.replay(); });
        how = "CUDA graph replay";
      }
#endif
      if (ms.empty()) ms = time_calls(options.iters, cuda, [&] { loader.run({noise}); });
      std::cout << "calls=" << options.iters << " median_ms=" << median(ms) << " (" << how << ", "
                << metadata_value(metadata, "solver") << ", " << metadata_value(metadata, "steps") << " steps, "
                << device_name << ")\n";
    }
    return 0;
  } catch (const std::exception& err) {
    std::cerr << "genie_runner: error: " << err.what() << "\n";
    return 1;
  }
}
