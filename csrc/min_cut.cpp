// lohan::min_cut_sink_side — a maximum flow and the sink side of the minimum cut it leaves.
//
// torch's min-cut partitioner (torch/_functorch/partitioners.py, solve_min_cut) builds a
// networkx graph of the joint graph and asks networkx for its minimum s-t cut, in pure
// Python: a third of the partitioner's time on a deep model. This is the same question in
// C++ (Dinic's algorithm), asked with the edges as arrays.
//
// The answer is the one networkx gives: the sink side is every node that can reach the sink
// in the residual graph of a maximum flow. That set is the same for every maximum flow (it
// is the minimum cut closest to the sink), so which flow the algorithm finds does not matter.
// Capacities are doubles; an infinite one is an edge no cut may take.

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace lohan {
namespace {

struct Arc {
  int64_t to;
  double residual;
};

class FlowGraph {
 public:
  explicit FlowGraph(int64_t nodes) : first_(nodes + 1, 0), level_(nodes), next_(nodes) {}

  // Arcs are stored by tail in one array (counting sort); arc k's reverse is partner_[k].
  void build(const int64_t* tails, const int64_t* heads, const double* capacity, int64_t edges) {
    const int64_t nodes = static_cast<int64_t>(level_.size());
    for (int64_t e = 0; e < edges; ++e) {
      ++first_[tails[e] + 1];
      ++first_[heads[e] + 1];
    }
    for (int64_t v = 0; v < nodes; ++v) first_[v + 1] += first_[v];
    arcs_.resize(2 * edges);
    partner_.resize(2 * edges);
    std::vector<int64_t> fill(first_.begin(), first_.end() - 1);
    for (int64_t e = 0; e < edges; ++e) {
      const int64_t forward = fill[tails[e]]++, backward = fill[heads[e]]++;
      arcs_[forward] = {heads[e], capacity[e]};
      arcs_[backward] = {tails[e], 0.0};
      partner_[forward] = backward;
      partner_[backward] = forward;
    }
  }

  double max_flow(int64_t source, int64_t sink) {
    double total = 0.0;
    while (levels_from(source, sink)) {
      for (size_t v = 0; v < next_.size(); ++v) next_[v] = first_[v];
      while (true) {
        const double pushed = augment(source, sink);
        if (pushed <= 0.0) break;
        if (std::isinf(pushed)) return pushed;  // a path of infinite edges: no finite cut
        total += pushed;
      }
    }
    return total;
  }

  // every node with a residual path to the sink
  std::vector<uint8_t> reaching(int64_t sink) const {
    std::vector<uint8_t> seen(level_.size(), 0);
    std::vector<int64_t> stack{sink};
    seen[sink] = 1;
    while (!stack.empty()) {
      const int64_t v = stack.back();
      stack.pop_back();
      for (int64_t k = first_[v]; k < first_[v + 1]; ++k) {
        // arc k runs v -> u; its partner runs u -> v, usable when it has residual capacity
        const int64_t u = arcs_[k].to;
        if (!seen[u] && arcs_[partner_[k]].residual > 0.0) {
          seen[u] = 1;
          stack.push_back(u);
        }
      }
    }
    return seen;
  }

 private:
  bool levels_from(int64_t source, int64_t sink) {
    std::fill(level_.begin(), level_.end(), -1);
    std::vector<int64_t> queue{source};
    level_[source] = 0;
    for (size_t i = 0; i < queue.size(); ++i) {
      const int64_t v = queue[i];
      for (int64_t k = first_[v]; k < first_[v + 1]; ++k) {
        const Arc& arc = arcs_[k];
        if (arc.residual > 0.0 && level_[arc.to] < 0) {
          level_[arc.to] = level_[v] + 1;
          queue.push_back(arc.to);
        }
      }
    }
    return level_[sink] >= 0;
  }

  // One augmenting path of the level graph, found without recursion: the path's arcs are
  // kept on a stack; a dead end is retreated from and never tried again in this phase.
  double augment(int64_t source, int64_t sink) {
    std::vector<int64_t> path;  // arc indices
    int64_t v = source;
    while (true) {
      if (v == sink) {
        double bottleneck = std::numeric_limits<double>::infinity();
        for (int64_t k : path) bottleneck = std::min(bottleneck, arcs_[k].residual);
        if (std::isinf(bottleneck)) return bottleneck;
        for (int64_t k : path) {
          arcs_[k].residual -= bottleneck;
          arcs_[partner_[k]].residual += bottleneck;
        }
        return bottleneck;
      }
      int64_t& k = next_[v];
      while (k < first_[v + 1] &&
             !(arcs_[k].residual > 0.0 && level_[arcs_[k].to] == level_[v] + 1)) {
        ++k;
      }
      if (k < first_[v + 1]) {
        path.push_back(k);
        v = arcs_[k].to;
        continue;
      }
      // a dead end: no path to the sink from v in this phase
      level_[v] = -1;
      if (path.empty()) return 0.0;
      const int64_t back = path.back();
      path.pop_back();
      v = arcs_[partner_[back]].to;
      ++next_[v];
    }
  }

  std::vector<int64_t> first_;
  std::vector<Arc> arcs_;
  std::vector<int64_t> partner_;
  std::vector<int64_t> level_;
  std::vector<int64_t> next_;
};

std::tuple<double, at::Tensor> min_cut_sink_side(const at::Tensor& tails, const at::Tensor& heads,
                                                 const at::Tensor& capacity, int64_t nodes, int64_t source,
                                                 int64_t sink) {
  TORCH_CHECK(tails.dtype() == at::kLong && heads.dtype() == at::kLong && capacity.dtype() == at::kDouble,
              "lohan::min_cut_sink_side takes int64 tails and heads and float64 capacities");
  TORCH_CHECK(tails.dim() == 1 && tails.sizes() == heads.sizes() && tails.sizes() == capacity.sizes(),
              "lohan::min_cut_sink_side: tails, heads and capacity must be 1-d and of one length");
  TORCH_CHECK(tails.is_contiguous() && heads.is_contiguous() && capacity.is_contiguous(),
              "lohan::min_cut_sink_side needs contiguous edge arrays");
  TORCH_CHECK(0 <= source && source < nodes && 0 <= sink && sink < nodes && source != sink,
              "lohan::min_cut_sink_side: source and sink must be two nodes of the graph");
  const int64_t edges = tails.numel();
  const int64_t* tail = tails.const_data_ptr<int64_t>();
  const int64_t* head = heads.const_data_ptr<int64_t>();
  const double* cap = capacity.const_data_ptr<double>();
  for (int64_t e = 0; e < edges; ++e) {
    TORCH_CHECK(0 <= tail[e] && tail[e] < nodes && 0 <= head[e] && head[e] < nodes,
                "lohan::min_cut_sink_side: edge ", e, " names a node outside the graph");
    TORCH_CHECK(cap[e] >= 0.0, "lohan::min_cut_sink_side: edge ", e, " has a negative capacity");
  }
  FlowGraph graph(nodes);
  graph.build(tail, head, cap, edges);
  const double value = graph.max_flow(source, sink);
  at::Tensor side = at::zeros({nodes}, tails.options().dtype(at::kBool));
  if (!std::isinf(value)) {
    const std::vector<uint8_t> reach = graph.reaching(sink);
    bool* out = side.data_ptr<bool>();
    for (int64_t v = 0; v < nodes; ++v) out[v] = reach[v] != 0;
  }
  return {value, side};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lohan, m) {
  m.def("min_cut_sink_side(Tensor tails, Tensor heads, Tensor capacity, int nodes, int source, int sink)"
        " -> (float, Tensor)");
}

TORCH_LIBRARY_IMPL(lohan, CPU, m) {
  m.impl("min_cut_sink_side", &min_cut_sink_side);
}

}  // namespace lohan
