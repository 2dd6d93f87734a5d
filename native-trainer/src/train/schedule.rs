//! Learning-rate schedules as transformers' `get_scheduler` builds them: a linear warmup from 0,
//! then linear decay to 0, half a cosine to 0, or a constant rate.

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The rate of the optimizer step that follows `done` completed steps. As in transformers'
    /// `LambdaLR`, the first step with warmup uses rate 0.
    pub fn lr(&self, done: usize) -> f64 {
        if done < self.warmup_steps {
            return self.peak_lr * done as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (done - self.warmup_steps) as f64 / decay_steps;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (1.0 - progress).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            kind,
            peak_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        }
    }

    #[test]
    fn warmup_then_each_shape() {
        let linear = schedule(ScheduleKind::Linear);
        assert_eq!([linear.lr(0), linear.lr(1), linear.lr(2)], [0.0, 0.5, 1.0]);
        assert_eq!(linear.lr(6), 0.5);
        assert_eq!(linear.lr(10), 0.0);
        let cosine = schedule(ScheduleKind::Cosine);
        assert!((cosine.lr(6) - 0.5).abs() < 1e-12);
        assert!(cosine.lr(10).abs() < 1e-12);
        let constant = schedule(ScheduleKind::Constant);
        assert_eq!([constant.lr(1), constant.lr(9)], [0.5, 1.0]);
    }
}
