// Group commit for audit appends, shared by the stores: concurrent appends
// share one transaction and one durable commit. The first caller with no
// commit in progress takes every event queued so far and commits them
// together; the others wait for the commit that holds theirs. Each caller
// returns only once its own event is durable (or the whole group failed:
// nothing of it is written).
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "core/status.h"
#include "server/store.h"

namespace keygate::server {

class GroupCommit {
 public:
  using Commit = std::function<Status(const std::vector<AuditEvent>&)>;
  explicit GroupCommit(Commit commit) : commit_(std::move(commit)) {}

  Status append(const AuditEvent& e) {
    std::unique_lock<std::mutex> lock(mu_);
    std::shared_ptr<Group> mine = open_;
    mine->events.push_back(e);
    while (!mine->done) {
      if (committing_) {
        cv_.wait(lock);
        continue;
      }
      committing_ = true;
      std::shared_ptr<Group> group = std::move(open_);
      open_ = std::make_shared<Group>();
      lock.unlock();
      Status status = commit_(group->events);
      lock.lock();
      group->status = std::move(status);
      group->done = true;
      committing_ = false;
      cv_.notify_all();
    }
    return mine->status;
  }

 private:
  struct Group {
    std::vector<AuditEvent> events;
    bool done = false;
    Status status;
  };

  Commit commit_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Group> open_ = std::make_shared<Group>();
  bool committing_ = false;
};

}  // namespace keygate::server
