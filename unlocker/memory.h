// Heap set-up for the unlock path.
#pragma once

#include <cstddef>

namespace keygate::unlocker {

// The first touch of a fresh page is a page fault, and on a virtual machine
// each costs about 10 us (measured on the development VM: 64 pages touched
// one by one, 0.7 ms; populated by one madvise, 0.04 ms). An unlock's main
// thread touches under 1 MiB of heap, libcryptsetup's two 256 KiB keyslot
// buffers among it (populating 2 MiB saved no more faults than 1 MiB).
//
// Call before any other thread starts. Allocations up to 4 MiB then come from
// the heap instead of mappings of their own, freed memory stays for reuse,
// and `bytes` of the heap are populated in one call (MADV_POPULATE_WRITE,
// Linux 5.14; on older kernels pages fault in as they are used). Nothing
// here holds a secret: libcryptsetup wipes its buffers before freeing them,
// and SecretBuffer keeps its own locked pages.
void prepare_heap_for_unlock(size_t bytes = 1u << 20);

}  // namespace keygate::unlocker
