//! AdamW on flat f32 parameter buffers, with PyTorch's semantics (`torch.optim.AdamW`): decoupled
//! weight decay applied before the Adam update, bias-corrected moments, `eps` added to the
//! bias-corrected root of the second moment.

/// The hyper-parameters besides the learning rate (which the schedule sets at every step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWParams {
    /// PyTorch's defaults (betas 0.9 / 0.999, eps 1e-8) with the given decoupled weight decay.
    pub fn with_weight_decay(weight_decay: f64) -> AdamWParams {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// AdamW's state for a list of parameter buffers (one pair of moments per buffer): what a
/// checkpoint saves of the optimizer. The hyper-parameters come with every step.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// Optimizer steps taken so far.
    step: u64,
    first_moments: Vec<Vec<f32>>,
    second_moments: Vec<Vec<f32>>,
}

impl AdamW {
    /// State for buffers of the given lengths, moments at zero.
    pub fn new(lengths: &[usize]) -> AdamW {
        AdamW {
            step: 0,
            first_moments: lengths.iter().map(|&n| vec![0.0; n]).collect(),
            second_moments: lengths.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// State saved by a checkpoint: `step` updates taken, moments per buffer. `None` when the
    /// moments' count or lengths differ from `lengths`.
    pub fn from_state(
        lengths: &[usize],
        step: u64,
        first_moments: Vec<Vec<f32>>,
        second_moments: Vec<Vec<f32>>,
    ) -> Option<AdamW> {
        let state = AdamW {
            step,
            first_moments,
            second_moments,
        };
        state.fits(lengths).then_some(state)
    }

    /// Whether the state is for buffers of the given lengths.
    pub fn fits(&self, lengths: &[usize]) -> bool {
        let fits = |moments: &[Vec<f32>]| moments.iter().map(Vec::len).eq(lengths.iter().copied());
        fits(&self.first_moments) && fits(&self.second_moments)
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first moments (`exp_avg`), one buffer per parameter.
    pub fn first_moments(&self) -> &[Vec<f32>] {
        &self.first_moments
    }

    /// The second moments (`exp_avg_sq`), one buffer per parameter.
    pub fn second_moments(&self) -> &[Vec<f32>] {
        &self.second_moments
    }

    /// One update of every buffer with its gradient, at learning rate `lr`. Buffers and
    /// gradients come in the order (and lengths) given to [`AdamW::new`].
    pub fn step(
        &mut self,
        params: AdamWParams,
        buffers: &mut [Vec<f32>],
        grads: &[Vec<f32>],
        lr: f64,
    ) {
        assert_eq!(
            buffers.len(),
            self.first_moments.len(),
            "one buffer per state"
        );
        assert_eq!(
            grads.len(),
            self.first_moments.len(),
            "one gradient per state"
        );
        self.step += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = params;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = (lr / bias_correction1) as f32;
        let decay = (1.0 - lr * weight_decay) as f32;
        // Coefficients in f64, then f32, as PyTorch passes Python floats to f32 kernels.
        let (one_minus_beta1, beta2, one_minus_beta2) =
            ((1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32);
        let (eps, bias_correction2_sqrt) = (eps as f32, bias_correction2_sqrt as f32);
        let states = self.first_moments.iter_mut().zip(&mut self.second_moments);
        for ((buffer, grad), (m, v)) in buffers.iter_mut().zip(grads).zip(states) {
            assert_eq!(buffer.len(), m.len(), "buffer length changed");
            assert_eq!(
                grad.len(),
                m.len(),
                "gradient length differs from its buffer"
            );
            for (((p, &g), m), v) in buffer.iter_mut().zip(grad).zip(m).zip(v) {
                *p *= decay;
                // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
                *m += (g - *m) * one_minus_beta1;
                *v = *v * beta2 + g * g * one_minus_beta2;
                let denom = v.sqrt() / bias_correction2_sqrt + eps;
                *p -= step_size * *m / denom;
            }
        }
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (factor `max_norm / (norm + 1e-6)`, never above 1).
/// Returns the norm before clipping. `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flatten()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 {
        let factor = (max_norm / (norm + 1e-6)).min(1.0);
        if factor < 1.0 {
            let factor = factor as f32;
            grads.iter_mut().flatten().for_each(|g| *g *= factor);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_times_sign_after_decay() {
        // Step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
        let mut opt = AdamW::new(&[3]);
        let mut buffers = vec![vec![1.0f32, -2.0, 0.5]];
        let params = AdamWParams::with_weight_decay(0.1);
        opt.step(params, &mut buffers, &[vec![0.3, -4.0, 0.0]], 0.01);
        let decay = 1.0 - 0.01 * 0.1;
        let expected = [1.0 * decay - 0.01, -2.0 * decay + 0.01, 0.5 * decay];
        for (got, want) in buffers[0].iter().zip(expected) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn second_step_uses_bias_corrected_moments() {
        let params = AdamWParams::with_weight_decay(0.0);
        let mut opt = AdamW::new(&[1]);
        let mut buffers = vec![vec![0.0f32]];
        opt.step(params, &mut buffers, &[vec![1.0]], 0.1);
        opt.step(params, &mut buffers, &[vec![3.0]], 0.1);
        // By hand: m = 0.9*0.1 + 0.1*3 = 0.39, v = 0.999*0.001 + 0.001*9 = 0.009999.
        let m_hat = 0.39 / (1.0 - 0.81);
        let v_hat = 0.009999 / (1.0 - 0.998001);
        let want = -0.1 - 0.1 * m_hat / (f64::sqrt(v_hat) + 1e-8);
        let got = f64::from(buffers[0][0]);
        assert!((got - want).abs() < 1e-6 * want.abs(), "{got} vs {want}");
    }

    #[test]
    fn a_restored_state_continues_exactly() {
        let params = AdamWParams::with_weight_decay(0.01);
        let grads = [vec![0.5f32, -1.5], vec![2.0f32, 0.25]];
        let mut whole = AdamW::new(&[2]);
        let mut a = vec![vec![1.0f32, 2.0]];
        whole.step(params, &mut a, &grads[..1], 0.1);
        let mut restored = AdamW::from_state(
            &[2],
            whole.steps(),
            whole.first_moments().to_vec(),
            whole.second_moments().to_vec(),
        )
        .unwrap();
        let mut b = a.clone();
        whole.step(params, &mut a, &grads[1..], 0.1);
        restored.step(params, &mut b, &grads[1..], 0.1);
        assert_eq!(a, b);
        assert!(AdamW::from_state(&[3], 1, vec![vec![0.0; 2]], vec![vec![0.0; 2]]).is_none());
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut grads = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip_grad_norm(&mut grads, 1.0), 5.0);
        let norm: f32 = grads.iter().flatten().map(|g| g * g).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let mut small = vec![vec![0.3f32]];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small[0][0], 0.3);
    }
}
