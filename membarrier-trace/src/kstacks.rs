//! `--stacks` in the kernel: gives it the unwinding rules the stacks thread learned from the
//! samples, reads the stacks it then unwinds and counts itself (`KSTACKS`), and frees both when
//! their process exits (docs/design.md, "Stacks").

use std::collections::{HashMap, HashSet};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use membarrier_trace_common::{KSTACK_FRAMES, KStack, KStackKey, UnwindKey, UnwindRule};

use crate::{
    model::{ProcKey, StackCount, Stacks},
    symbolize::{Learned, MAX_STACKS},
};

pub struct KernelStacks {
    rules: BpfHashMap<MapData, UnwindKey, UnwindRule>,
    rows: BpfHashMap<MapData, KStackKey, KStack>,
    /// The addresses given a rule, per process: freed at its exit.
    taught: HashMap<ProcKey, Vec<u64>>,
    /// Rules the kernel had no room for: their stacks keep going to userspace as samples.
    pub rules_dropped: u64,
}

impl KernelStacks {
    /// Over the kernel's `UNWIND` and `KSTACKS` maps.
    pub fn new(
        rules: BpfHashMap<MapData, UnwindKey, UnwindRule>,
        rows: BpfHashMap<MapData, KStackKey, KStack>,
    ) -> Self {
        Self {
            rules,
            rows,
            taught: HashMap::new(),
            rules_dropped: 0,
        }
    }

    /// Gives the kernel the rules learned for processes still alive.
    pub fn teach(&mut self, learned: Learned, live: &HashSet<ProcKey>) {
        for (key, rule) in learned {
            let p = (key.tgid, key.serial);
            if !live.contains(&p) {
                continue;
            }
            match self.rules.insert(key, rule, 0) {
                Ok(()) => self.taught.entry(p).or_default().push(key.pc),
                Err(_) => self.rules_dropped += 1,
            }
        }
    }

    /// Moves the stacks the kernel counted for the `dead` into `stacks` (each under its own
    /// process: the retire pass then sums them like the samples' stacks) and frees their rules.
    pub fn retire(&mut self, dead: &HashSet<ProcKey>, stacks: &mut Stacks) -> Result<()> {
        for p in dead {
            for pc in self.taught.remove(p).unwrap_or_default() {
                let _ = self.rules.remove(&UnwindKey {
                    pc,
                    tgid: p.0,
                    serial: p.1,
                });
            }
        }
        let keys: Vec<KStackKey> = self
            .rows
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the kernel's stacks")?;
        for k in keys.iter().filter(|k| dead.contains(&(k.tgid, k.serial))) {
            let row = self.rows.get(k, 0).context("reading a kernel stack")?;
            self.rows.remove(k).context("freeing a kernel stack")?;
            add(stacks, k, &row);
        }
        Ok(())
    }

    /// `stacks` with the stacks the kernel counted for live processes added.
    pub fn with_live(&self, mut stacks: Stacks) -> Result<Stacks> {
        for item in self.rows.iter() {
            let (k, row) = item.context("reading the kernel's stacks")?;
            // Made, its first call not yet added.
            if row.exact + row.sampled > 0 {
                add(&mut stacks, &k, &row);
            }
        }
        Ok(stacks)
    }
}

fn add(stacks: &mut Stacks, k: &KStackKey, row: &KStack) {
    let depth = (row.depth as usize).min(KSTACK_FRAMES);
    let c = StackCount {
        exact: row.exact,
        exact_ns: row.exact_ns,
        sampled: row.sampled,
        sampled_ns: row.sampled_ns,
        complete: row.complete != 0,
        kernel: row.exact + row.sampled,
    };
    let g = ((k.tgid, k.serial), k.cmd, k.flags);
    stacks.add(g, row.pcs[..depth].to_vec(), &c, MAX_STACKS);
}
