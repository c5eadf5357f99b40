// The static release build's handler for std::terminate, in place of
// libstdc++'s verbose one, which demangles the exception's type name and so
// links the whole C++ demangler (about 50 KB) into every initramfs. libstdc++
// reads the handler from this variable; defining it here keeps the library's
// default (and the demangler) out of the link. Normal builds keep libstdc++'s.
#include <cstdio>
#include <cstdlib>
#include <exception>

namespace {

[[noreturn]] void terminate_keygate() {
  const char* what = "no exception";
  if (std::exception_ptr current = std::current_exception()) {
    what = "an exception of an unknown type";
    try {
      std::rethrow_exception(current);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
  }
  fprintf(stderr, "keygate: fatal: terminate called (%s)\n", what);
  abort();
}

}  // namespace

namespace __cxxabiv1 {
// NOLINTNEXTLINE: the name libstdc++ looks up
std::terminate_handler __terminate_handler = terminate_keygate;
}  // namespace __cxxabiv1
