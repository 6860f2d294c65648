//! Exits and OOM kills as the shims report them: container state,
//! exit reasons and the CRI's container events.

use super::*;

impl Runtime {
    /// Watches task `task_id` of pod `pod_id` (the sandbox or a container)
    /// and records its exit.
    pub(super) fn watch_exit(self: &Arc<Self>, pod_id: &str, task_id: &str) {
        let (rt, pod_id, task_id) = (self.clone(), pod_id.to_string(), task_id.to_string());
        tokio::spawn(async move {
            let Ok(shim) = rt.shim(&pod_id).await else { return };
            // An error names how the task was lost: its VM ended, its
            // agent went silent, or the shim itself went away.
            let (code, at, lost) = match shim.wait(&task_id, "").await {
                Ok((code, at)) => (code as i32, at, None),
                Err(e) => (255, now_ns(), Some(e.to_string())),
            };
            if task_id == pod_id {
                let mut st = rt.state.lock().await;
                if let Some(p) = st.pods.get_mut(&pod_id) {
                    if p.state == PodState::Ready {
                        p.state = PodState::NotReady;
                        let _ = rt.store.save_pod(p);
                    }
                }
            } else {
                rt.container_exited(&task_id, code, at, lost).await;
            }
        });
    }

    pub(super) async fn container_exited(&self, id: &str, code: i32, at: i64, lost: Option<String>) {
        let output = {
            let mut st = self.state.lock().await;
            let oom = st.oom.remove(id);
            let Some(c) = st.containers.get_mut(id) else { return };
            if c.state == ContainerState::Exited {
                return;
            }
            c.state = ContainerState::Exited;
            c.exit_code = code;
            c.finished_at = at;
            c.reason = if oom {
                "OOMKilled".into()
            } else if let Some(why) = lost {
                // Kata's word for a container whose VM went away.
                c.message = why;
                "Error".into()
            } else if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            };
            let _ = self.store.save_container(c);
            st.outputs.remove(id)
        };
        if let Some(o) = output {
            o.finish().await;
        }
        self.emit(id, ContainerEventType::ContainerStoppedEvent);
    }
}
